"""Web pages for the exports feature (issue 6)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
