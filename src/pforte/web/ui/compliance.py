"""Web pages for the compliance feature (issue 6)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
