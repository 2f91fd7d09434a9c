"""ROS 2 layer of geopurify_ros: the `geopurify_mapping` node and its ROS-free helpers.

`mapping_node` (rclpy node + worker), `params` (parameter table / validation), `sync` (approximate-time
pairing, keyframe gate), `pose_source` (pose buffer, PoseStamped / Odometry / TF), `msg_convert`
(ROS messages <-> numpy). Only `mapping_node` imports rclpy at module level.
"""
