"""raftmesh.api"""
