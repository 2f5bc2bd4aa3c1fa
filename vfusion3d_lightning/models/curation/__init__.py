"""Curation networks: DINO video features, the quality SVM and the elevation MLP."""
