"""pelab training glue: Hydra entry point, Lightning module, callbacks, evaluation, reports."""
