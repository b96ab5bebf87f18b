"""The torch layer: expert and flat networks (architecture, width rule, cost model), the one
training loop, torch-backed predictors, central training and tree extension."""
