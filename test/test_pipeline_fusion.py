"""MappingPipeline.process_frame fuses with the configured depth-guided sampling (config -> VoxelMap.fuse_frame)."""
import dataclasses

import torch

from geopurify_ros.config import PipelineConfig
from geopurify_ros.pipeline import MappingPipeline
from geopurify_ros.voxel_map import VoxelMap

from test_pipeline_locking import WordBackend, frame


def test_depth_guide_sigma_reaches_fusion():
    cfg = PipelineConfig(device="cpu", class_names=["chair", "wall", "table"])
    maps = {}
    for sigma in (0.0, 0.03):
        pipe = MappingPipeline(dataclasses.replace(cfg, depth_guide_sigma=sigma), backend=WordBackend())
        rgb, depth, cam, T, stamp = frame(0)
        pipe.process_frame(rgb, depth, cam, T, stamp)
        ref = VoxelMap(cfg.voxel_size, WordBackend.dim)
        ref.fuse_frame(depth, WordBackend().encode_image(rgb), rgb, cam, T, stamp, stride=cfg.stride,
                       min_depth=cfg.min_depth, max_depth=cfg.max_depth, guide_sigma=sigma)
        assert torch.equal(pipe.voxel_map.keys, ref.keys)
        assert torch.equal(pipe.voxel_map.features, ref.features), sigma
        maps[sigma] = pipe.voxel_map.features_f32()
    # the frame's depth is rough (1.5-1.9 m per pixel), so guidance changes the samples
    assert float((maps[0.0] - maps[0.03]).abs().max()) > 1e-2
