"""napari plugin (npe2 manifest ``napari.yaml``; extra ``napari``).

* widget "Segment": a checkpoint, run directory, adapter, ``.onnx`` or bioimage.io ``.zip``
  segments the active Image layer into a Labels layer and a Points layer of centroids
  (count in its name, per-object table below); "Fine-tune on my corrections" trains a LoRA
  adapter on the edited Labels layer and segments again with it;
* reader: ``unetkit predict`` outputs (``*_instances.png/.tif`` -> Labels, overlays) and
  run directories (training curves, sample overlays);
* sample data: synthetic cells with their true labels.

The widget calls ``unetkit.workflows.interactive`` only (the web page calls the same).
"""
