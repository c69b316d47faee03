"""Vision-label construction: image-to-label (OCR), alignment to visual tokens, label-to-image (rendering)."""
