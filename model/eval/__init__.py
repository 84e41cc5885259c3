"""Evaluation: the generator's first-attempt scores, fidelity, utility, the run report."""
