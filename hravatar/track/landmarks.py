"""478-point face landmarks from MediaPipe (imported lazily: the ``track`` extra).

Two back-ends with one interface:
- the legacy face mesh that ships inside the mediapipe wheel (``mediapipe.solutions.face_mesh``,
  refined: 468 mesh points + 10 iris points), no download needed;
- the MediaPipe Tasks ``FaceLandmarker`` when the user supplies its ``face_landmarker.task``
  model file (same 478 points, plus 52 ARKit blendshape scores).

Landmarks are returned in pixels: x right, y down, in the continuous pixel convention of
:mod:`hravatar.encoder.crop` (MediaPipe's normalised coordinates times the image size), and z
as MediaPipe's relative depth (centre of the head ~0, smaller = closer) in the same pixel units.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Number of landmarks of the refined face mesh.
NUM_LANDMARKS = 478


class MediaPipeMissing(ImportError):
    """MediaPipe is not installed (message says how to install it)."""


def import_mediapipe():
    """The ``mediapipe`` module, or :class:`MediaPipeMissing` with a one-line install hint."""
    try:
        import mediapipe as mp
    except ImportError as e:  # also catches a broken OpenCV that mediapipe imports
        raise MediaPipeMissing(f"face tracking needs MediaPipe: pip install 'hravatar[track]' ({e})") from None
    return mp


@dataclass
class Detection:
    """One tracked face in one image.

    landmarks: [478, 3] float32: x, y in pixels, z relative depth (pixels, smaller = closer).
    box: [4] float32 (x0, y0, x1, y1) pixel bounding box of the landmarks.
    num_faces: faces found in the image (the largest is reported).
    blendshapes: ARKit blendshape name -> score in [0, 1] (Tasks model only), else None.
    """

    landmarks: np.ndarray
    box: np.ndarray
    num_faces: int
    blendshapes: dict[str, float] | None = None

    @property
    def size(self) -> float:
        """Face size in pixels: sqrt of the landmark box area."""
        w, h = self.box[2] - self.box[0], self.box[3] - self.box[1]
        return float(np.sqrt(max(w, 0.0) * max(h, 0.0)))


def _to_pixels(norm_landmarks, width: int, height: int) -> np.ndarray:
    pts = np.array([(p.x, p.y, p.z) for p in norm_landmarks], dtype=np.float32)
    return pts * np.array([width, height, width], dtype=np.float32)


def _box(pts: np.ndarray) -> np.ndarray:
    return np.concatenate([pts[:, :2].min(0), pts[:, :2].max(0)]).astype(np.float32)


class FaceLandmarker:
    """Per-frame 478-point face landmarks of the largest face.

    Args:
        model_path: optional ``face_landmarker.task`` (MediaPipe Tasks, with blendshapes); None =
            the face mesh inside the mediapipe wheel.
        video: frames come from one video stream (tracking between frames, faster and steadier);
            False treats each image independently.
        max_faces: faces looked for (more than one so that the largest can be chosen and
            "several faces" reported).
        min_detection_confidence, min_tracking_confidence: MediaPipe thresholds.
    Raises:
        MediaPipeMissing: mediapipe is not installed.
        FileNotFoundError: ``model_path`` given but missing.
    """

    def __init__(self, model_path: str | Path | None = None, video: bool = True, max_faces: int = 2,
                 min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5):
        mp = import_mediapipe()
        self.video = video
        self.max_faces = max_faces
        self._last_ts = -1
        self.backend = "face_mesh"
        if model_path is not None:
            path = Path(model_path)
            if not path.is_file():
                raise FileNotFoundError(f"face landmarker model not found: {path}")
            from mediapipe.tasks.python import BaseOptions, vision

            mode = vision.RunningMode.VIDEO if video else vision.RunningMode.IMAGE
            opts = vision.FaceLandmarkerOptions(
                base_options=BaseOptions(model_asset_path=str(path)), running_mode=mode, num_faces=max_faces,
                output_face_blendshapes=True, min_face_detection_confidence=min_detection_confidence,
                min_face_presence_confidence=min_detection_confidence, min_tracking_confidence=min_tracking_confidence)
            try:
                self._impl = vision.FaceLandmarker.create_from_options(opts)
            except Exception as e:  # a corrupt or foreign .task file
                raise ValueError(f"cannot load face landmarker model {path}: {e}") from None
            self._mp = mp
            self.backend = "tasks"
        else:
            self._impl = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=not video, max_num_faces=max_faces, refine_landmarks=True,
                min_detection_confidence=min_detection_confidence, min_tracking_confidence=min_tracking_confidence)

    def detect(self, image: np.ndarray, timestamp_ms: int | None = None) -> Detection | None:
        """Landmarks of the largest face in an RGB image, or None when there is no face.

        Args:
            image: [H, W, 3] uint8 RGB.
            timestamp_ms: frame time (Tasks video mode needs increasing times; made increasing
                here when not).
        """
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"FaceLandmarker expects an [H, W, 3] uint8 RGB image, got {image.dtype} {image.shape}")
        H, W = image.shape[:2]
        image = np.ascontiguousarray(image)
        blend = None
        if self.backend == "tasks":
            mp_img = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=image)
            if self.video:
                ts = self._last_ts + 33 if timestamp_ms is None else int(timestamp_ms)
                ts = max(ts, self._last_ts + 1)
                self._last_ts = ts
                res = self._impl.detect_for_video(mp_img, ts)
            else:
                res = self._impl.detect(mp_img)
            faces = [_to_pixels(f, W, H) for f in res.face_landmarks]
            blends = res.face_blendshapes or [None] * len(faces)
        else:
            res = self._impl.process(image)
            faces = [_to_pixels(f.landmark, W, H) for f in (res.multi_face_landmarks or [])]
            blends = [None] * len(faces)
        faces = [(f, b) for f, b in zip(faces, blends) if f.shape[0] >= NUM_LANDMARKS]
        if not faces:
            return None
        boxes = [_box(f) for f, _ in faces]
        areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
        i = int(np.argmax(areas))
        pts, cats = faces[i]
        if cats is not None:
            blend = {c.category_name: float(c.score) for c in cats}
        return Detection(pts[:NUM_LANDMARKS], boxes[i], len(faces), blend)

    def close(self) -> None:
        """Release MediaPipe's graph (idempotent)."""
        impl, self._impl = getattr(self, "_impl", None), None
        if impl is not None:
            impl.close()

    def __enter__(self) -> "FaceLandmarker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PersonSegmenter:
    """Foreground (person) probability per pixel with MediaPipe's selfie segmentation (in the wheel).

    The method trains its expression encoder on matted frames (black background); applying the
    same matting at test time keeps the encoder in its training domain.

    Args:
        landscape: MediaPipe's faster landscape model (256x144 input) instead of the general one.
    """

    def __init__(self, landscape: bool = False):
        mp = import_mediapipe()
        self._impl = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=1 if landscape else 0)

    def mask(self, image: np.ndarray) -> np.ndarray:
        """[H, W] float32 foreground probability in [0, 1] of an [H, W, 3] uint8 RGB image."""
        res = self._impl.process(np.ascontiguousarray(image))
        m = res.segmentation_mask
        if m is None:
            return np.zeros(image.shape[:2], np.float32)
        return np.clip(m.astype(np.float32), 0.0, 1.0)

    def matte(self, image: np.ndarray) -> np.ndarray:
        """The image with its background set to black (uint8, same shape)."""
        return (image.astype(np.float32) * self.mask(image)[..., None]).round().astype(np.uint8)

    def close(self) -> None:
        impl, self._impl = getattr(self, "_impl", None), None
        if impl is not None:
            impl.close()
