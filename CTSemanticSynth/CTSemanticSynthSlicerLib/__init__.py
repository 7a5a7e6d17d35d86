"""Module-side helpers of the CTSemanticSynth Slicer module (no Qt): background process, segment-to-class
mapping, torch-free model lookup, the headless Logic, and the dependency installer used by the Widget."""
