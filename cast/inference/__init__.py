"""From a trained model (or the foundation-model teacher) to results on your own images: image
sources (`sources`), the shared resize / batch / predict path behind every model's
`predict_images` (`api`), the COCO instances json (`coco_output`, `cast.save_coco`), streamed,
sharded, resumable prediction (`stream`) and the predict / label / export / eval commands
(`commands`)."""
