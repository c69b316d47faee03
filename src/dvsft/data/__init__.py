"""Datasets: public-layout converters and the training collator."""
