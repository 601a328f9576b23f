# RetinaNet (mmdet's own config) on a VisionFM encoder with a ViTDet simple feature pyramid.
# downstream/det.py fills in, from the run config: the backbone's modality / weights / random_init / img_size,
# the neck's in_channels (the encoder width), the classes, the normaliser mean/std (the encoder's), and the
# test score threshold. Any other field can be changed here or with model.mmdet overrides in the YAML.
_base_ = 'mmdet::_base_/models/retinanet_r50_fpn.py'
custom_imports = dict(imports=['visionfm.tasks.detection.models'], allow_failed_imports=False)

model = dict(
    data_preprocessor=dict(bgr_to_rgb=False, pad_size_divisor=32),  # images arrive as RGB
    backbone=dict(_delete_=True, type='VisionFMViT', modality='cfp', out_indices=(11, )),
    # strides 8, 16, 32 from the stride-16 ViT map, then 64 and 128 by subsampling: RetinaNet's P3-P7
    neck=dict(_delete_=True, type='SimpleFeaturePyramid', in_channels=192, out_channels=256,
              scale_factors=(2.0, 1.0, 0.5), num_outs=5),
    bbox_head=dict(num_classes=1))
