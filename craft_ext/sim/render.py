"""Small camera frames from a dedicated offscreen `mujoco.Renderer`, fast enough to render every step.

Why not the environment's own renderer: MetaWorld renders through gymnasium's viewer at 480 x 480
with 4x multisampling, shadows and reflections, ~140 ms a frame in Mesa's software rasteriser, and
changing those settings on gymnasium's viewer made later environments in the same process render
all-black frames. A renderer of our own, at the policy's size, with multisampling (the bulk of the
cost), shadows and reflections off, takes 9-14 ms of one core for a 64 px frame (the more the machine
is shared, the more); what remains grows with the Sawyer arm's ~68k mesh triangles, not with the image size.
"""

from __future__ import annotations

import atexit

import mujoco
import numpy as np


class CameraRenderer:
    """RGB frames (uint8, size x size x 3) of one named camera of `model`."""

    def __init__(self, model: mujoco.MjModel, camera: str, size: int):
        if mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera) < 0:
            cameras = [model.camera(i).name for i in range(model.ncam)]
            raise ValueError(f"no camera {camera!r} in the MetaWorld scene; its cameras are: {', '.join(cameras)}")
        model.vis.quality.offsamples = 0  # read when the GL context is made: set before the Renderer
        self._renderer = mujoco.Renderer(model, size, size)
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        self._camera = camera
        # closed before EGL shuts down at exit (mujoco registered that when it made its first context):
        # a renderer left to the garbage collector then would print an EGL error
        atexit.register(self.close)

    def render(self, data: mujoco.MjData) -> np.ndarray:
        self._renderer.update_scene(data, camera=self._camera)
        return self._renderer.render()

    def close(self) -> None:
        atexit.unregister(self.close)
        self._renderer.close()
