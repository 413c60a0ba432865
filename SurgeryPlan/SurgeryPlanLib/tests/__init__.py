"""SurgeryPlan's tests: run by pytest here, and by SurgeryPlanTest inside Slicer."""

import pkgutil

# Listed from the package folder at import time, so a new test_*.py file is picked up without editing this file.
TEST_MODULES = sorted(f"{__name__}.{module.name}" for module in pkgutil.iter_modules(__path__)
                      if module.name.startswith("test_"))
