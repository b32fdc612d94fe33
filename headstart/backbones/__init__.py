"""The backbone zoo: registry, preprocessing, replicas, torch weights and fine-tuning cut points."""
