"""Related systems as methods: ASVR codes and head, GranViT/FineViT region tasks, localized self-distillation,
and `dvsft compare`, which trains and scores every method on the same embedded data."""
