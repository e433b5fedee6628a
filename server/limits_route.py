"""GET /limits: the input limits a client must respect, read-only and open (no API key), so that a client (the
playground page) can refuse an input before sending it rather than after a round trip.

Each figure is read from where it is enforced, never restated (engine/image_processor.py); `null` means that
no such limit is enforced. The field names are those of the reliability work's admission limits
(max_body_bytes, max_images, max_image_pixels, max_request_pixels), which this endpoint will serve in full.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from engine.image_processor import ALLOWED_FORMATS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

router = APIRouter()


class Limits(BaseModel):
    max_body_bytes: int | None = Field(description="Bytes of a request body (null: no limit)")
    max_images: int | None = Field(description="Images in one request (null: no limit)")
    max_image_bytes: int = Field(description="Bytes of one image, after base64 decoding")
    max_image_pixels: int = Field(description="Pixels (width x height) of one image")
    max_request_pixels: int | None = Field(description="Pixels of all of a request's images (null: no limit)")
    image_formats: list[str] = Field(description="Image formats accepted (as PIL names them)")


@router.get("/limits", summary="The server's input limits (read-only)", response_model=Limits)
async def limits() -> Limits:
    return Limits(max_body_bytes=None, max_images=None, max_image_bytes=MAX_IMAGE_BYTES,
                  max_image_pixels=MAX_IMAGE_PIXELS, max_request_pixels=None, image_formats=list(ALLOWED_FORMATS))
