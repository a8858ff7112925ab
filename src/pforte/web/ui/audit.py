"""Web pages for the audit feature (issue 6)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
