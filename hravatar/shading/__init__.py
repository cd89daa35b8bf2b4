"""Physically-based shading and HDR image-based lighting (split-sum, as HRAvatar).

Conventions: cube maps are [6, R, R, C] in OpenGL face order/orientation (nvdiffrast
compatible); lat-long maps are [H, W, C], +y up, image centre looking towards -z
(see :mod:`hravatar.shading.cubemap`).
"""
from .brdf import compute_brdf_lut, load_brdf_lut, sample_brdf_lut
from .cubemap import (
    cube_dirs,
    cube_mip_chain,
    cube_to_latlong,
    dir_to_cube_uv,
    dir_to_latlong_uv,
    downsample_cube,
    face_uv_to_dir,
    latlong_dirs,
    latlong_to_cube,
    resample_cube,
    rotate_y,
    sample_cube,
    sample_cube_mips,
    sample_latlong,
)
from .envmap_io import EnvmapError, load_envmap, read_exr, read_hdr, save_envmap, write_exr, write_hdr
from .lighting import LearnedLighting
from .pbr import edit_material, fresnel_schlick_roughness, shade
from .prefilter import (
    Environment,
    constant_environment,
    irradiance_from_latlong,
    load_environment,
    prefilter_cube,
    prefilter_latlong,
    save_environment,
)
from .procedural import builtin_environment_names, make_builtin_environment
from .tonemap import srgb_eotf, srgb_oetf, to_uint8, tonemap

__all__ = [
    "EnvmapError",
    "Environment",
    "LearnedLighting",
    "builtin_environment_names",
    "compute_brdf_lut",
    "constant_environment",
    "cube_dirs",
    "cube_mip_chain",
    "cube_to_latlong",
    "dir_to_cube_uv",
    "dir_to_latlong_uv",
    "downsample_cube",
    "edit_material",
    "face_uv_to_dir",
    "fresnel_schlick_roughness",
    "irradiance_from_latlong",
    "latlong_dirs",
    "latlong_to_cube",
    "load_brdf_lut",
    "load_environment",
    "load_envmap",
    "make_builtin_environment",
    "prefilter_cube",
    "prefilter_latlong",
    "read_exr",
    "read_hdr",
    "resample_cube",
    "rotate_y",
    "sample_brdf_lut",
    "sample_cube",
    "sample_cube_mips",
    "sample_latlong",
    "save_environment",
    "save_envmap",
    "shade",
    "srgb_eotf",
    "srgb_oetf",
    "to_uint8",
    "tonemap",
    "write_exr",
    "write_hdr",
]
