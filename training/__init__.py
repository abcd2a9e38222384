"""Regional training: region -> instruction dataset, curriculum fine-tuning, evaluation.

- `training.region`, `training.osm`: rasters + OSM vectors -> chips with their visible objects
- `training.captions`, `training.vqa`, `training.grounding`, `training.classification`: the
  per-chip task generators; `training.build`: the dataset writer (`rsvlm-train build-data`)
- `training.fit`: the curriculum (`rsvlm-train fit`), with `training.features` (vision feature
  cache) and `training.lm_data` (prompts and labels)
- `training.evaluate`, `training.metrics`, `training.probe`: evaluation (`rsvlm-train eval`,
  `rsvlm-train probe`)

See docs/training.md.
"""
