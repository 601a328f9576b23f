# FCOS (mmdet's config, GN head, centre sampling, GIoU) on a VisionFM encoder with a simple feature pyramid.
# downstream/det.py fills in the run-specific fields (see retinanet.py).
_base_ = 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py'
custom_imports = dict(imports=['visionfm.tasks.detection.models'], allow_failed_imports=False)

model = dict(
    data_preprocessor=dict(bgr_to_rgb=False, pad_size_divisor=32),
    backbone=dict(_delete_=True, type='VisionFMViT', modality='cfp', out_indices=(11, )),
    neck=dict(_delete_=True, type='SimpleFeaturePyramid', in_channels=192, out_channels=256,
              scale_factors=(2.0, 1.0, 0.5), num_outs=5),
    bbox_head=dict(num_classes=1))
