"""The robot agent: RealSense cameras -> PolicyService.StreamAct -> chunk executor + safety -> Piper arms over CAN.

It runs on the robot PC and installs with the `agent` extra only (grpcio, protobuf, numpy, pyrealsense2,
python-can): importing it never pulls torch or the services. Recording (`--record`) is the one part that
needs the `data` extra (LeRobot), imported only when a recording is written.

    config.py    one typed config (robot_agent/configs/piper_dual.yaml), validated on load
    piper.py     the Piper CAN protocol (byte-equal to AgileX's piper_sdk) and one driver per arm
    safety.py    limits applied inside the driver, before every frame leaves
    cameras.py   RealSense pipelines by serial -> synchronised, letterboxed views
    policy.py    StreamAct client: deadlines, reconnect with backoff, asynchronous requests
    executor.py  chunks on the control grid: latency drop, cross-fade
    agent.py     the control loop, watchdog, e-stop, home moves, command log
    sim.py       simulated Piper (python-can virtual bus) and cameras (pyrealsense2 software device)
    recording.py executed episodes -> LeRobot dataset (rise.data.dataset)
    cli.py       `rise-agent`
"""

__version__ = "0.1.0"
