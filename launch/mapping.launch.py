"""Launch the geopurify mapping node with the packaged parameters.

    ros2 launch geopurify_ros mapping.launch.py device:=cuda pose_source:=odometry odom_topic:=/odom
    ros2 launch geopurify_ros mapping.launch.py params_file:=/path/to/my_mapping.yaml use_sim_time:=true
    ros2 launch geopurify_ros mapping.launch.py rviz:=true      # also start rviz2 with rviz/mapping.rviz

Defaults come from share/geopurify_ros/config/mapping.yaml; the launch arguments below override
individual parameters on top of that file.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

# (launch argument = node parameter, default, description); defaults mirror config/mapping.yaml.
PARAM_ARGUMENTS = [
    ("color_topic", "/camera/color/image_raw", "Colour image topic"),
    ("depth_topic", "/camera/depth/image_raw", "Depth image topic (registered to colour)"),
    ("camera_info_topic", "/camera/color/camera_info", "CameraInfo of the colour camera"),
    ("pose_source", "pose", "pose | odometry | tf"),
    ("pose_topic", "/camera/pose", "PoseStamped of the camera optical frame"),
    ("odom_topic", "/odom", "Odometry of the robot base"),
    ("map_frame", "map", "World frame of the map"),
    ("sensor_qos", "best_effort", "best_effort | reliable (bag replay)"),
    ("device", "auto", "Torch device: auto | cpu | cuda | cuda:N"),
    ("feature_backend", "lseg", "Feature backend: lseg | conse | open_clip"),
    ("cloud_color", "semantic", "Cloud rgb: semantic (label palette) | rgb (camera colour)"),
]


def generate_launch_description():
    params_file = LaunchConfiguration("params_file")
    args = [
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution([FindPackageShare("geopurify_ros"), "config", "mapping.yaml"]),
            description="Parameters file of the geopurify_mapping node"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="Use /clock (bag replay)"),
        DeclareLaunchArgument("cloud_topic", default_value="/geopurify_mapping/labelled_cloud",
                              description="Remap of ~/labelled_cloud"),
        DeclareLaunchArgument("log_level", default_value="info", description="Logger level"),
        DeclareLaunchArgument("rviz", default_value="false", description="Also start rviz2 with rviz/mapping.rviz"),
    ]
    args += [DeclareLaunchArgument(name, default_value=default, description=desc)
             for name, default, desc in PARAM_ARGUMENTS]

    overrides = {name: LaunchConfiguration(name) for name, _, _ in PARAM_ARGUMENTS}
    overrides["use_sim_time"] = ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool)

    node = Node(
        package="geopurify_ros",
        executable="mapping_node",
        name="geopurify_mapping",
        output="screen",
        emulate_tty=True,
        parameters=[params_file, overrides],
        remappings=[("~/labelled_cloud", LaunchConfiguration("cloud_topic"))],
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        output="log",
        arguments=["-d", PathJoinSubstitution([FindPackageShare("geopurify_ros"), "rviz", "mapping.rviz"])],
        parameters=[{"use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool)}],
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    return LaunchDescription(args + [node, rviz])
