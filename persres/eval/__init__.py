"""Evaluation with the paper's metrics (CLIP-T, CLIP-I, DINO-I) and the CustomConcept101 bench."""
