"""SurgeryPlan's own methods on plain masks: geometry (distances, margins, planes, volumetry), vascular territories,
the resection plan that combines them, and its one-page report."""
