"""raftmesh.bench"""
