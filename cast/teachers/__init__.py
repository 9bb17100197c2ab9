"""Foundation-model teachers: Grounding-DINO + SAM 2 / SAM (`vfm`) and SAM 3 (`sam3`), on the shared
base of `foundation`, built from local folders in the hub layout by `hub.zero_shot_teacher`."""
