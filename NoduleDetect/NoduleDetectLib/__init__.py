"""NoduleDetect's own methods: classical nodule candidates, per-nodule segmentation and measurements."""
