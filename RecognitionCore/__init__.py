"""RecognitionCore: what NoduleDetect, OrganSegment and SurgeryPlan share (Qt-free, runs in Slicer and outside it)."""
