"""Analysis: the visual logit lens and plots."""
