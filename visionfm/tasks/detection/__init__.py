"""Box detection on top of a modality encoder, through mmdet.

- :mod:`.boxes`: boxes from masks (connected components) and around points, box checks, the record type.
- :mod:`.points`: the point-localisation metric (distance at the original resolution, fraction within 1/8
  disc diameter).
- :mod:`.models`: the encoder as an mmdet backbone (``VisionFMViT``) and a ViTDet-style simple feature pyramid
  (``SimpleFeaturePyramid``), registered in mmdet's ``MODELS`` registry when the module is imported.
- :mod:`.dataset`, :mod:`.evaluation`: resizing data loader, COCO / point evaluation.
- :mod:`.cli` and :mod:`.runner`: the command line of ``downstream/det.py`` (parser, config, legacy keys) and the
  training run on :class:`visionfm.engine.loop.TrainLoop`.

Importing this package does not import mmdet; :mod:`.models` and :mod:`.runner` do.
"""
