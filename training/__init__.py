"""CoTAP training wing: model, checkpoint loading, losses, data, trainer and evaluation (torch)."""
