"""Embedded worlds: procedurally rendered scenes with exact, rule-based rewards (see README.md)."""

from flowdppo.worlds.shapes import (BACKGROUND, CATEGORIES, COLORS, HELDOUT_PAIRS, IMAGE_SIZE, OOD_CATEGORIES, RELATIONS, SHAPES,
                     SPLITS, Detection, Prompt, Scene, SceneObject, Score, detect, parse_prompt, prompt_pool,
                     prompt_sets, relation_holds, render, sample_prompt, scene_for_prompt, score, score_batch,
                     vocabulary)

__all__ = ["BACKGROUND", "CATEGORIES", "COLORS", "HELDOUT_PAIRS", "IMAGE_SIZE", "OOD_CATEGORIES", "RELATIONS", "SHAPES",
           "SPLITS", "Detection", "Prompt", "Scene", "SceneObject", "Score", "detect", "parse_prompt", "prompt_pool",
           "prompt_sets", "relation_holds", "render", "sample_prompt", "scene_for_prompt", "score", "score_batch",
           "vocabulary"]
