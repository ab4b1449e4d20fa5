"""raftmesh.cli"""
