"""Workflows: the top storey. Recipes (segmentation, regression, diffusion, LoRA) and the
predict / evaluate / generate pipelines that every front-end (CLI, napari, web, Dask) calls.

Modules:
    segment        predict / evaluate files and arrays with a segmentation or regression model
    segment_recipe the segmentation and regression recipe (config, presets, config.json)
    segment_train  ``train``: a recipe -> data, model, loss, trainer
    calibrate      seed-threshold calibration on validation data
    report         end-of-run reports and sample pictures
    diffuse        ``DiffusionPipeline``: generate / inpaint
    diffuse_train  the diffusion recipe and ``train_diffusion``
    adapt          LoRA: attach, train, load adapters over their base
"""
