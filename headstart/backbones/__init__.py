"""The backbone zoo: registry, preprocessing, hand-built replicas, torch weights and fine-tuning cut points."""
