"""Foundation-model teachers: Grounding-DINO + SAM 2 / SAM (`vfm`), built from local folders in the
hub layout by `hub.zero_shot_teacher`."""
