"""raftmesh.proto"""
