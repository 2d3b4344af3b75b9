"""An example stackml trainer: a small Keras regression model on synthetic or CSV data."""
