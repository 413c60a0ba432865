"""SurgeryPlan's own methods: resection-planning geometry on plain masks (distances, margins, planes, volumetry)."""
