"""How a stage runs, not what it computes: device, precision, torchrun, run folders and checkpoints, flags,
what runs around pretraining's epochs and fine-tuning's seeds, models, pixels and their decoding (DICOM,
16-bit), splits, duplicates, the demo images. Imports no stage script, tool or evaluation."""
