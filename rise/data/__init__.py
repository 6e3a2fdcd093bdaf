"""Robot data: LeRobot datasets (v3), their schema, collection, conversion, statistics, loading."""
