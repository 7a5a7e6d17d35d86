"""Standalone trainer for CTSemanticSynth models: slice cache preparation, training, export."""
