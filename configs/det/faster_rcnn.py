# Faster R-CNN (mmdet's config) on a VisionFM encoder with ViTDet's simple feature pyramid (strides 4-64).
# downstream/det.py fills in the run-specific fields (see retinanet.py).
_base_ = 'mmdet::_base_/models/faster-rcnn_r50_fpn.py'
custom_imports = dict(imports=['visionfm.tasks.detection.models'], allow_failed_imports=False)

model = dict(
    data_preprocessor=dict(bgr_to_rgb=False, pad_size_divisor=32),
    backbone=dict(_delete_=True, type='VisionFMViT', modality='cfp', out_indices=(11, )),
    # strides 4, 8, 16, 32 from the ViT map and 64 by subsampling, as the RPN anchors and RoI extractor expect
    neck=dict(_delete_=True, type='SimpleFeaturePyramid', in_channels=192, out_channels=256,
              scale_factors=(4.0, 2.0, 1.0, 0.5), num_outs=5),
    roi_head=dict(bbox_head=dict(num_classes=1)))
