"""The floor both sides stand on: errors, storage and retry, and the commit record's format.

`pipelines/` (the driver) and `workers/` (the actor side) both import from
here; nothing here imports either of them, so the street runs one way:
`pipelines` may import `workers`, `workers` never imports `pipelines`.
"""
