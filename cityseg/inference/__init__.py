"""Using a trained model: `evaluate_checkpoint` (eval), `Predictor` / `run_predict` (predict),
`export_model` (export). Every checkpoint is read through `cityseg.checkpoint.load_from_checkpoint`;
nothing here imports the training loop."""
