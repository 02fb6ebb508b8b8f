"""The DINO baseline's pieces (head, multi-crop views, loss, schedules, teacher EMA) and our opt-in
anti-collapse objectives for CASS."""
