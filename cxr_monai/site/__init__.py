"""Per-site calibration: fitting, cross-fitted evaluation, acceptance, site profiles carried by a bundle."""
