"""Stage 5, the library: targets, schedule rules, tuning databases, MetaSchedule tuning, build."""
