"""OrganSegment's own methods on plain images: interactive segmentation, mask clean-up and organ statistics."""
